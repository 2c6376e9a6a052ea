//! Connections to one endpoint: an idle stack of HTTP/1.1 connections with
//! keep-alive (driven by the request's own task, see [`super::h1`]), or a
//! few HTTP/2 connections, another opened when every one is at its stream
//! limit (one connection per endpoint stalls under load).
//!
//! Each worker has its part of the pool, as each of Envoy's workers has
//! its own pools. A request that finds no connection to use is one of
//! Envoy's pending requests until it has one (the circuit breaker's
//! `max_pending_requests` bounds them, cluster-wide); when the breaker's
//! `max_connections` leaves none to open, it waits for one of its worker's
//! to come back idle, for a stream of one to end, or for one to close
//! (Envoy's rule: a worker with no connection at all to the endpoint opens
//! one regardless, or its requests would have nothing to wait for).

use std::cell::Cell;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{
    AtomicU32, AtomicU64, AtomicUsize,
    Ordering::{Relaxed, SeqCst},
};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::h1;
use crate::config::cluster::{ClusterConfig, FamilyOrder};
use crate::proxy::body::RequestBody;
use crate::stats::ClusterStats;

/// The body of an upstream request: streamed from downstream, or buffered
/// so that it can be sent again on retry.
pub type ReqBody = Either<RequestBody, Full<Bytes>>;

/// The body of an upstream response: from an HTTP/1.1 connection of the
/// pool, or from hyper (HTTP/2, and upgrades refused by the upstream).
pub type RespBody = Either<h1::Body, Incoming>;

/// What [`Pool::send`] gives: the answer, and for HTTP/2 the stream slot
/// its body holds.
pub type SendResult = Result<(Response<RespBody>, Option<StreamSlot>), SendError>;

pin_project_lite::pin_project! {
    /// The future of [`Pool::send_noting`]: the exchange, raced against the
    /// try's deadline when there is one (`None` when the deadline came
    /// first). Both are in place: this future is large and on every
    /// request's path, and each wrapper around it would copy it whole.
    pub struct Sending<'a, F> {
        #[pin]
        how: How<'a, F>,
        // Outside tokio's task budget, as `tokio::time::timeout`'s timer
        // is: a streaming upload that spends the budget on every poll
        // must not hold the deadline off.
        #[pin]
        deadline: Option<tokio::task::Unconstrained<tokio::time::Sleep>>,
    }
}

pin_project_lite::pin_project! {
    /// An exchange on a reused HTTP/1.1 connection in place, anything else
    /// boxed.
    #[project = HowProj]
    enum How<'a, F> {
        /// HTTP/1.1 on a connection from the idle list.
        Reused { #[pin] fut: F },
        /// HTTP/2, or a new connection first.
        Boxed { fut: Pin<Box<dyn Future<Output = SendResult> + Send + 'a>> },
    }
}

impl<F> Future for Sending<'_, F>
where
    F: Future<Output = Result<Response<h1::Body>, SendError>>,
{
    type Output = Option<SendResult>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<SendResult>> {
        let this = self.project();
        let sent = match this.how.project() {
            HowProj::Reused { fut } => fut
                .poll(cx)
                .map(|r| r.map(|resp| (resp.map(Either::Left), None))),
            HowProj::Boxed { fut } => fut.as_mut().poll(cx),
        };
        if let Poll::Ready(r) = sent {
            return Poll::Ready(Some(r));
        }
        match this.deadline.as_pin_mut() {
            Some(d) => d.poll(cx).map(|()| None),
            None => Poll::Pending,
        }
    }
}

/// Why a request never got a response from the endpoint.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// TCP connect failed or timed out.
    #[error("connection failure: {0}")]
    Connect(String),
    /// The connection or stream was reset before response headers.
    #[error("connection termination: {0}")]
    Reset(String),
    /// The upstream's answer broke HTTP (a malformed or oversized head,
    /// conflicting framing): Envoy's protocol error.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The circuit breaker's limit on pending requests is reached (or,
    /// checked by the router, on requests).
    #[error("overflow: too many pending requests")]
    Overflow,
    /// The client's request body failed while it was being sent: the
    /// client went away (`gone`), or its body was malformed.
    #[error("request body from the client failed: {why}")]
    Downstream {
        /// The client went away (rather than sending bad input).
        gone: bool,
        /// What happened.
        why: String,
    },
}

/// How many worker threads there are (set once at start-up).
static WORKERS: AtomicUsize = AtomicUsize::new(1);

thread_local! {
    /// This thread's worker number, if it is a worker.
    static WORKER: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Says how many worker threads serve traffic; call before any cluster
/// exists.
pub fn set_workers(n: usize) {
    WORKERS.store(n.max(1), Relaxed);
}

/// Marks the calling thread as worker `i`.
pub fn set_worker(i: usize) {
    WORKER.with(|w| w.set(Some(i)));
}

/// The idle list the calling thread uses: its worker's, or one shared by
/// every thread that is not a worker.
fn slot(lists: usize) -> usize {
    WORKER
        .with(Cell::get)
        .filter(|i| *i + 1 < lists)
        .unwrap_or(lists - 1)
}

/// One worker's part of an endpoint's pool.
#[derive(Default)]
pub struct WorkerPool {
    /// Idle HTTP/1.1 connections, newest last. A socket is registered with
    /// the runtime of the worker that opened it; used from another worker
    /// every readiness event would cross threads (an eventfd write and a
    /// wake-up per request).
    idle: Mutex<Vec<h1::Connection>>,
    /// HTTP/2 connections: a connection's task runs on the worker that
    /// opened it, and a request from another worker would cross threads at
    /// every step.
    h2: Mutex<Vec<H2>>,
    /// What the worker's connections and streams hold too.
    share: Arc<Share>,
}

/// A worker's count of its open connections to the endpoint and the
/// wake-up of its pending requests: held by each connection and HTTP/2
/// stream, apart from [`WorkerPool`] (whose lists hold the connections:
/// held there, they would keep the pool alive).
#[derive(Default)]
pub struct Share {
    /// Connections the worker opened (or is opening) still open.
    open: AtomicU32,
    /// Its requests waiting for a connection.
    waiting: AtomicU32,
    /// Drains of the pool so far: a connection made before the last is
    /// not used again.
    pub(super) generation: AtomicU32,
    /// Wakes one of them.
    wake: tokio::sync::Notify,
    /// The endpoint's open connections (all workers).
    endpoint_open: Arc<AtomicU32>,
    /// The cluster's counters (its open connections among them).
    stats: Arc<ClusterStats>,
}

impl WorkerPool {
    /// Takes back a connection that is idle again (for a waiting request
    /// first, if any).
    pub(super) fn put_idle(&self, conn: h1::Connection) {
        if !conn.undrained() {
            return; // closed: the pool was drained while it was busy
        }
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(conn);
        // Its look at the list is under the same lock, after its count:
        // either it finds the connection or this sees the count.
        self.share.wake_one();
    }
}

impl Share {
    /// Tells a waiting request that a connection came back, a stream
    /// ended or a connection closed. (Sequentially consistent with the
    /// waiter's count and check, so that either it finds what changed or
    /// it is woken: a plain load on x86.)
    fn wake_one(&self) {
        if self.waiting.load(SeqCst) != 0 {
            self.wake.notify_one();
        }
    }
}

/// Counts a request among a worker's waiting ones while it lives.
struct Waiting<'a>(&'a Share);

impl<'a> Waiting<'a> {
    fn new(share: &'a Share) -> Self {
        share.waiting.fetch_add(1, SeqCst);
        // The count in order before every later look at the connections
        // (see `OpenSlot`'s drop).
        std::sync::atomic::fence(SeqCst);
        Waiting(share)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, SeqCst);
    }
}

/// Counts a request among the cluster's pending ones while it lives.
struct Pending<'a>(&'a AtomicU64);

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

struct H2 {
    tx: http2::SendRequest<ReqBody>,
    streams: Arc<Streams>,
    /// This side's address on the connection.
    local: Option<SocketAddr>,
    /// When it was opened.
    born: Instant,
    /// Streams opened on it, against the cluster's
    /// `max_requests_per_connection`.
    used: u32,
}

/// A connection pool for one endpoint.
pub struct Pool {
    addr: SocketAddr,
    /// The endpoint's other addresses (`additional_addresses`): with any,
    /// connections are made the happy eyeballs way over all of them.
    also: Arc<[SocketAddr]>,
    /// What an answer head may hold.
    answer_head: crate::config::cluster::AnswerHead,
    /// How HTTP/1.1 request heads are written.
    h1: crate::config::cluster::H1Client,
    http2: bool,
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_streams: u32,
    max_uses: u32,
    /// The cluster's limit on open connections (counted in the cluster's
    /// stats, over all its endpoints' pools).
    max_connections: u32,
    /// This endpoint's (`per_host_thresholds`), counted in `open`.
    max_host_connections: u32,
    /// The cluster's limit on requests waiting for a connection (counted
    /// in the cluster's stats).
    max_pending: u32,
    /// Where connections are made from (`upstream_bind_config`).
    source: Option<SocketAddr>,
    /// TCP keep-alive on its connections.
    keepalive: Option<crate::config::Keepalive>,
    /// HTTP/2 settings.
    h2: crate::config::cluster::H2Client,
    /// The order of the endpoint's addresses when it has several.
    family_order: FamilyOrder,
    /// A connection open this long takes no new request
    /// (`max_connection_duration`).
    max_age: Option<Duration>,
    /// Each worker's part, and last one for threads that are not workers.
    workers: Box<[Arc<WorkerPool>]>,

    /// Open connections.
    pub open: Arc<AtomicU32>,
    stats: Arc<ClusterStats>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("addr", &self.addr)
            .field("open", &self.open.load(Relaxed))
            .finish()
    }
}

impl Pool {
    /// Whether pools made from `a` and from `b` would be alike: every
    /// setting [`Pool::new`] takes from the cluster is the same. (A
    /// cluster's endpoints, pools and all, outlive a change of its config
    /// only then.)
    pub fn alike(a: &ClusterConfig, b: &ClusterConfig) -> bool {
        a.http2 == b.http2
            && a.connect_timeout == b.connect_timeout
            && a.idle_timeout == b.idle_timeout
            && a.max_concurrent_streams == b.max_concurrent_streams
            && a.max_requests_per_connection == b.max_requests_per_connection
            && a.limits.max_connections == b.limits.max_connections
            && a.limits.max_host_connections == b.limits.max_host_connections
            && a.limits.max_pending == b.limits.max_pending
            && a.source_address == b.source_address
            && a.keepalive == b.keepalive
            && a.h1 == b.h1
            && a.h2 == b.h2
            && a.family_order == b.family_order
            && a.max_connection_age == b.max_connection_age
            && a.answer_head == b.answer_head
    }

    /// An empty pool.
    pub fn new(addr: SocketAddr, cfg: &ClusterConfig, stats: Arc<ClusterStats>) -> Self {
        let open = Arc::new(AtomicU32::new(0));
        Pool {
            addr,
            also: Arc::new([]),
            answer_head: cfg.answer_head,
            h1: cfg.h1,
            http2: cfg.http2,
            connect_timeout: cfg.connect_timeout,
            idle_timeout: cfg.idle_timeout,
            max_streams: cfg.max_concurrent_streams,
            max_uses: cfg.max_requests_per_connection.unwrap_or(u32::MAX),
            max_connections: cfg.limits.max_connections,
            max_host_connections: cfg.limits.max_host_connections,
            max_pending: cfg.limits.max_pending,
            source: cfg.source_address,
            keepalive: cfg.keepalive,
            h2: cfg.h2,
            family_order: cfg.family_order,
            max_age: cfg.max_connection_age,
            workers: (0..=WORKERS.load(Relaxed))
                .map(|_| {
                    Arc::new(WorkerPool {
                        share: Arc::new(Share {
                            endpoint_open: open.clone(),
                            stats: stats.clone(),
                            ..Share::default()
                        }),
                        ..WorkerPool::default()
                    })
                })
                .collect(),
            open,
            stats,
        }
    }

    /// Drains the pool, as Envoy drains a host's pools: idle connections
    /// are closed now, busy ones close when their request ends, and every
    /// request from now on goes on a new one.
    pub fn drain(&self) {
        for w in &self.workers {
            w.share.generation.fetch_add(1, Relaxed);
            w.idle.lock().unwrap_or_else(|p| p.into_inner()).clear();
            // Their open streams finish; the connections then close.
            w.h2.lock().unwrap_or_else(|p| p.into_inner()).clear();
        }
    }

    /// The pool with the endpoint's other addresses.
    pub fn with_also(mut self, also: Arc<[SocketAddr]>) -> Self {
        self.also = also;
        self
    }

    /// The endpoint's other addresses.
    pub fn also(&self) -> &[SocketAddr] {
        &self.also
    }

    /// What an answer head may hold.
    pub fn answer_head(&self) -> crate::config::cluster::AnswerHead {
        self.answer_head
    }

    /// Sends a request. An HTTP/2 response holds a stream slot, which must
    /// live as long as its body; an HTTP/1.1 body returns its connection to
    /// the pool itself when it ends cleanly.
    pub async fn send(&self, req: Request<ReqBody>) -> SendResult {
        match self.send_noting(req, None, None, None).await {
            Some(r) => r,
            // Without a deadline the exchange is the only way to end.
            None => unreachable!("a send without a deadline timed out"),
        }
    }

    /// [`Pool::send`], noting in `local` this side's address on the
    /// connection used (for access logs that ask for it), and given up at
    /// `deadline` (the future's output is then `None`). With `lend`, the
    /// request's header map is handed back there before this returns (a
    /// retry sends it again): HTTP/1.1 is done with it once the head is
    /// encoded, HTTP/2 gets a copy.
    ///
    /// Not an `async fn`: the common case (HTTP/1.1 on an idle connection)
    /// is decided before the future is made, so the future is the
    /// exchange's alone, without the request beside it; the rest is boxed.
    pub fn send_noting<'a>(
        &'a self,
        req: Request<ReqBody>,
        local: Option<&'a mut Option<SocketAddr>>,
        deadline: Option<tokio::time::Instant>,
        lend: Option<&mut Option<HeaderMap>>,
    ) -> Sending<'a, impl Future<Output = Result<Response<h1::Body>, SendError>> + Send + 'a> {
        let deadline = deadline.map(|d| tokio::task::unconstrained(tokio::time::sleep_until(d)));
        if self.http2 {
            if let Some(slot) = lend {
                *slot = Some(req.headers().clone());
            }
            // Boxed: hyper's HTTP/2 client state is large.
            return Sending {
                how: How::Boxed {
                    fut: Box::pin(async move {
                        let (resp, slot) = self.send_h2(req, local).await?;
                        Ok((resp.map(Either::Right), Some(slot)))
                    }),
                },
                deadline,
            };
        }
        let worker = self.worker();
        let ret = h1::Return {
            to: worker.clone(),
            max_uses: self.max_uses,
            allow_chunked_length: self.h1.allow_chunked_length,
        };
        // (While requests wait for a connection, a new one waits behind
        // them: Envoy serves its pending requests first.)
        let idle = match worker.share.waiting.load(Relaxed) {
            0 => self.take_idle(worker),
            _ => None,
        };
        let Some(mut conn) = idle else {
            let req = h1::prepare(req, Vec::new(), lend, self.h1);
            return Sending {
                how: How::Boxed {
                    // Boxed: connecting (or waiting) is rare next to reuse,
                    // and its state large.
                    fut: Box::pin(async move {
                        let conn = match self.connection(worker, || self.take_idle(worker)).await? {
                            Either::Left(idle) => idle,
                            Either::Right((io, slot)) => h1::Connection::new(io, slot),
                        };
                        let resp = h1::exchange(conn, req, ret, self, local).await?;
                        Ok((resp.map(Either::Left), None))
                    }),
                },
                deadline,
            };
        };
        let req = h1::prepare(req, conn.take_wbuf(), lend, self.h1);
        Sending {
            how: How::Reused {
                fut: h1::exchange(conn, req, ret, self, local),
            },
            deadline,
        }
    }

    /// Whether an idle connection may still be used: not idle too long,
    /// not closed or written to by the origin.
    fn still_good(&self, c: &h1::Connection) -> bool {
        // (Wrapping milliseconds, as the connection keeps them: right for
        // spans under 24 days.)
        let now = super::now_ms() as u32;
        c.undrained()
            && u128::from(now.wrapping_sub(c.idle_since_ms)) <= self.idle_timeout.as_millis()
            && self
                .max_age
                .is_none_or(|m| u128::from(now.wrapping_sub(c.born_ms)) < m.as_millis())
            && c.is_usable()
    }

    /// Closes idle connections that idled out or that the origin closed
    /// (run periodically, so that they do not linger without traffic).
    pub fn sweep_idle(&self) {
        for w in &self.workers {
            let mut idle = w.idle.lock().unwrap_or_else(|p| p.into_inner());
            idle.retain(|c| self.still_good(c));
        }
        // HTTP/2 connections past their age, or closed: let go (one past
        // its age closes once its open streams end).
        let now = Instant::now();
        for w in &self.workers {
            let mut conns = w.h2.lock().unwrap_or_else(|p| p.into_inner());
            conns.retain(|c| !c.tx.is_closed() && c.used < self.max_uses && self.young(c, now));
        }
    }

    /// Whether an HTTP/2 connection may still take new streams by its age.
    fn young(&self, c: &H2, now: Instant) -> bool {
        self.max_age.is_none_or(|m| now.duration_since(c.born) < m)
    }

    /// The part of the pool the calling thread uses: its worker's, or one
    /// shared by every thread that is not a worker.
    fn worker(&self) -> &Arc<WorkerPool> {
        &self.workers[slot(self.workers.len())]
    }

    /// The most recently used idle connection that is still good.
    fn take_idle(&self, worker: &WorkerPool) -> Option<h1::Connection> {
        let good = |c: &h1::Connection| self.still_good(c);
        let mut idle = worker.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(c) = idle.pop() {
            if good(&c) {
                return Some(c);
            }
            // One went stale (the origin closed it, or it idled out): the
            // others may have too; close them all now rather than hold
            // their sockets until each comes up (dropping one closes it).
            idle.retain(good);
        }
        None
    }

    /// A connection's socket, as a pending request gets one (see
    /// [`Pool::connection`]): a new one, or an idle HTTP/1.1 one's (so
    /// that a connection coming back is never lost on a request that
    /// could not use it).
    pub(super) async fn tcp(&self) -> Result<(TcpStream, OpenSlot), SendError> {
        let worker = self.worker();
        let ready = || self.take_idle(worker).map(h1::Connection::into_socket);
        match self.connection(worker, ready).await? {
            Either::Left(idle) => Ok(idle),
            Either::Right(new) => Ok(new),
        }
    }

    /// Drains so far (see [`Pool::drain`]).
    #[cfg(test)]
    pub(super) fn drains(&self) -> u32 {
        self.workers[0].share.generation.load(Relaxed)
    }

    /// What a request that found no connection to use gets, as one of
    /// Envoy's pending requests (counted as such until it has it, connect
    /// included; over the circuit breaker's `max_pending_requests`, an
    /// overflow): a new connection if the circuit breakers leave one (or
    /// the worker has none at all to the endpoint); else the first thing
    /// `ready` finds (a connection come back idle, a stream free) or a
    /// new connection once one of the worker's closes.
    async fn connection<T>(
        &self,
        worker: &WorkerPool,
        mut ready: impl FnMut() -> Option<T>,
    ) -> Result<Either<T, (TcpStream, OpenSlot)>, SendError> {
        let _pending = self.pend()?;
        let share = &*worker.share;
        // Others waiting already: this one queues behind them (each change
        // wakes the one that has waited longest) rather than take what
        // comes back first.
        let behind = share.waiting.load(SeqCst) != 0;
        let slot = match self.open_slot(&worker.share) {
            Some(slot) => slot,
            None => {
                self.stats.upstream_cx_overflow.fetch_add(1, Relaxed);
                let _waiting = Waiting::new(share);
                let mut look = !behind;
                loop {
                    // Registered before looking, so that nothing that
                    // changes after the look goes unnoticed.
                    let wake = share.wake.notified();
                    tokio::pin!(wake);
                    wake.as_mut().enable();
                    if look {
                        if let Some(t) = ready() {
                            return Ok(Either::Left(t));
                        }
                        if let Some(slot) = self.open_slot(&worker.share) {
                            break slot;
                        }
                    }
                    look = true;
                    wake.await;
                }
            }
        };
        let io = if self.also.is_empty() {
            self.dial(self.addr).await?
        } else {
            // Boxed: a rare state, larger than a plain connect's.
            Box::pin(self.dial_happily()).await?
        };
        Ok(Either::Right((io, slot)))
    }

    /// Counts a request as pending, if the circuit breaker's
    /// `max_pending_requests` leaves room (else an overflow).
    fn pend(&self) -> Result<Pending<'_>, SendError> {
        let (pending, max) = (
            &self.stats.upstream_rq_pending_active,
            u64::from(self.max_pending),
        );
        if pending
            .fetch_update(Relaxed, Relaxed, |n| (n < max).then_some(n + 1))
            .is_err()
        {
            self.stats
                .upstream_rq_pending_overflow
                .fetch_add(1, Relaxed);
            return Err(SendError::Overflow);
        }
        self.stats.upstream_rq_pending_total.fetch_add(1, Relaxed);
        Ok(Pending(pending))
    }

    /// A TCP connection to the first of the endpoint's addresses that
    /// takes one, tried as Envoy's happy eyeballs try them: in order, the
    /// families interleaved (RFC 8305: the first address's family, then
    /// the other, and so on), the next attempt started when the one
    /// before fails or has not connected within 300 ms, earlier ones
    /// still running; all within the connect timeout.
    async fn dial_happily(&self) -> Result<TcpStream, SendError> {
        const NEXT_AFTER: Duration = Duration::from_millis(300);
        let order = interleaved(self.addr, &self.also, self.family_order);
        let mut attempts = tokio::task::JoinSet::new();
        let mut next = 0;
        let overall = tokio::time::sleep(self.connect_timeout);
        tokio::pin!(overall);
        let stagger = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(stagger);
        let connected = loop {
            tokio::select! {
                () = &mut stagger, if next < order.len() => {
                    attempts.spawn(connect(order[next], self.source));
                    next += 1;
                    stagger.as_mut().reset(tokio::time::Instant::now() + NEXT_AFTER);
                }
                Some(done) = attempts.join_next(), if !attempts.is_empty() => {
                    let why = match done {
                        Ok(Ok(s)) => break Ok(s),
                        Ok(Err(e)) => e.to_string(),
                        Err(e) => e.to_string(),
                    };
                    if next < order.len() {
                        // A failure starts the next at once.
                        stagger.as_mut().reset(tokio::time::Instant::now());
                    } else if attempts.is_empty() {
                        break Err(why);
                    }
                }
                () = &mut overall => {
                    break Err(format!("timed out after {:?}", self.connect_timeout));
                }
            }
        };
        // Attempts still under way are dropped (aborted) with the set.
        match connected {
            Ok(s) => {
                self.ready(&s);
                Ok(s)
            }
            Err(why) => {
                self.stats.upstream_cx_connect_fail.fetch_add(1, Relaxed);
                Err(SendError::Connect(why))
            }
        }
    }

    /// A place among the open connections for one of `share`'s worker's,
    /// if the circuit breakers leave one (the cluster's over all its
    /// endpoints, and the endpoint's own), or if that worker has none open
    /// to the endpoint (Envoy's rule: its pending requests would otherwise
    /// have nothing to wait for; the counts then go past the limits).
    /// Counted from the start, so that connects under way count too.
    fn open_slot(&self, share: &Arc<Share>) -> Option<OpenSlot> {
        let (host_max, max) = (self.max_host_connections, u64::from(self.max_connections));
        let host_ok = self
            .open
            .fetch_update(Relaxed, Relaxed, |n| (n < host_max).then_some(n + 1))
            .is_ok();
        let cluster_ok = host_ok
            && self
                .stats
                .upstream_cx_active
                .fetch_update(Relaxed, Relaxed, |n| (n < max).then_some(n + 1))
                .is_ok();
        if !cluster_ok {
            if share.open.load(SeqCst) != 0 {
                if host_ok {
                    self.open.fetch_sub(1, Relaxed);
                }
                return None;
            }
            if !host_ok {
                self.open.fetch_add(1, Relaxed);
            }
            self.stats.upstream_cx_active.fetch_add(1, Relaxed);
        }
        share.open.fetch_add(1, SeqCst);
        Some(OpenSlot(share.clone()))
    }

    /// A TCP connection to `addr`, within the connect timeout.
    async fn dial(&self, addr: SocketAddr) -> Result<TcpStream, SendError> {
        let stream =
            match tokio::time::timeout(self.connect_timeout, connect(addr, self.source)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    self.stats.upstream_cx_connect_fail.fetch_add(1, Relaxed);
                    return Err(SendError::Connect(e.to_string()));
                }
                Err(_) => {
                    self.stats.upstream_cx_connect_fail.fetch_add(1, Relaxed);
                    return Err(SendError::Connect(format!(
                        "timed out after {:?}",
                        self.connect_timeout
                    )));
                }
            };
        self.ready(&stream);
        Ok(stream)
    }

    /// Sets up a new connection's socket (no Nagle; keep-alive when the
    /// cluster asks for it) and counts it.
    fn ready(&self, stream: &TcpStream) {
        let _ = stream.set_nodelay(true);
        if let Some(k) = &self.keepalive {
            // (Its values were checked against the kernel's bounds.)
            if let Err(e) = k.apply(socket2::SockRef::from(stream)) {
                tracing::debug!(error = %e, "upstream TCP keep-alive not set");
            }
        }
        self.stats.upstream_cx_total.fetch_add(1, Relaxed);
    }

    /// Opens a hyper connection that is not pooled (for upgrades), with
    /// upgrades on.
    pub async fn connect_h1(&self) -> Result<http1::SendRequest<ReqBody>, SendError> {
        let (io, slot) = self.tcp().await?;
        self.handshake_h1(io, Some(slot)).await
    }

    /// A health check's HTTP/1.1 connection to `addr` (the endpoint's
    /// check address): with the pool's settings, but outside the circuit
    /// breakers, as Envoy's checks are (a cluster at its connection limit
    /// is not thereby unhealthy).
    pub async fn connect_h1_at(
        &self,
        addr: SocketAddr,
    ) -> Result<http1::SendRequest<ReqBody>, SendError> {
        let io = self.dial(addr).await?;
        self.handshake_h1(io, None).await
    }

    /// hyper's HTTP/1.1 client (upgrades, health checks), held to the
    /// cluster's answer-head limits as near as hyper counts: a head's
    /// bytes with its status line, and its fields.
    async fn handshake_h1(
        &self,
        io: TcpStream,
        slot: Option<OpenSlot>,
    ) -> Result<http1::SendRequest<ReqBody>, SendError> {
        let mut builder = http1::Builder::new();
        builder.max_header_size(self.answer_head.http1_unfinished_bytes());
        // (hyper's default is 100; another count moves its field list
        // to the heap.)
        if self.answer_head.fields != 100 {
            builder.max_headers(usize::from(self.answer_head.fields));
        }
        let (tx, conn) = builder
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| SendError::Connect(e.to_string()))?;
        tokio::spawn(async move {
            let _open = slot;
            let _ = conn.with_upgrades().await;
        });
        Ok(tx)
    }

    /// A health check's HTTP/2 (prior knowledge) connection to `addr`,
    /// outside the circuit breakers (as [`Pool::connect_h1_at`]).
    pub async fn connect_h2_at(
        &self,
        addr: SocketAddr,
    ) -> Result<http2::SendRequest<ReqBody>, SendError> {
        let io = self.dial(addr).await?;
        self.handshake_h2(io, None).await.map(|(tx, _)| tx)
    }

    /// A stream on one of `worker`'s HTTP/2 connections, if one can take
    /// another; a request that was `waiting` passes a second free stream
    /// on to the next one waiting.
    fn h2_stream(&self, worker: &WorkerPool, waiting: bool) -> Option<H2Stream> {
        let mut conns = worker.h2.lock().unwrap_or_else(|p| p.into_inner());
        // (Past its age, or with as many streams opened as a connection
        // may carry, a connection takes no new stream; its open ones
        // finish, and it closes when they have.)
        let now = self.max_age.map(|_| Instant::now());
        conns.retain(|c| {
            !c.tx.is_closed() && c.used < self.max_uses && now.is_none_or(|now| self.young(c, now))
        });
        // (Read in order with the waiting count: see `Share::wake_one`.)
        let i = conns
            .iter()
            .position(|c| c.streams.open.load(SeqCst) < self.max_streams)?;
        let c = &mut conns[i];
        let open = c.streams.open.fetch_add(1, SeqCst) + 1;
        c.used += 1;
        let found = (c.tx.clone(), StreamSlot(c.streams.clone()), c.local);
        if c.used >= self.max_uses {
            // Its last stream: let go of it now, so that it closes when
            // that stream ends, traffic or not.
            conns.swap_remove(i);
        } else if waiting && open < self.max_streams {
            c.streams.share.wake_one();
        }
        Some(found)
    }

    async fn handshake_h2(
        &self,
        io: TcpStream,
        slot: Option<OpenSlot>,
    ) -> Result<(http2::SendRequest<ReqBody>, Option<SocketAddr>), SendError> {
        let from = io.local_addr().ok();
        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder.timer(TokioTimer::new());
        let h2 = &self.h2;
        if let Some((interval, timeout)) = h2.keepalive {
            builder
                .keep_alive_interval(interval)
                .keep_alive_timeout(timeout)
                .keep_alive_while_idle(true);
        }
        if let Some(w) = h2.stream_window {
            builder.initial_stream_window_size(w);
        }
        if let Some(w) = h2.connection_window {
            builder.initial_connection_window_size(w);
        }
        if let Some(t) = h2.header_table {
            builder.header_table_size(t);
        }
        builder.max_header_list_size(self.answer_head.http2_bytes());
        let (tx, conn) = builder
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| SendError::Connect(e.to_string()))?;
        tokio::spawn(async move {
            let _open = slot;
            let _ = conn.await;
        });
        Ok((tx, from))
    }

    async fn send_h2(
        &self,
        req: Request<ReqBody>,
        local: Option<&mut Option<SocketAddr>>,
    ) -> Result<(Response<Incoming>, StreamSlot), SendError> {
        let worker = self.worker();
        let free = match worker.share.waiting.load(Relaxed) {
            0 => self.h2_stream(worker, false),
            _ => None,
        };
        let found = match free {
            Some(found) => found,
            None => match self
                .connection(worker, || self.h2_stream(worker, true))
                .await?
            {
                Either::Left(found) => found,
                Either::Right((io, slot)) => {
                    let share = slot.0.clone();
                    let (tx, from) = self.handshake_h2(io, Some(slot)).await?;
                    let streams = Arc::new(Streams {
                        open: AtomicU32::new(1),
                        share,
                    });
                    if self.max_uses > 1 {
                        worker
                            .h2
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(H2 {
                                tx: tx.clone(),
                                streams: streams.clone(),
                                local: from,
                                born: Instant::now(),
                                used: 1,
                            });
                        // Its other streams are for requests waiting.
                        streams.share.wake_one();
                    }
                    (tx, StreamSlot(streams), from)
                }
            },
        };
        let (mut tx, slot, from) = found;
        if let Some(l) = local {
            *l = from;
        }
        if tx.ready().await.is_err() {
            return Err(SendError::Reset("HTTP/2 connection closed".into()));
        }
        match tx.send_request(req).await {
            // Envoy's HTTP/2 codec counts the answer's map, `:status` in
            // it, against the cluster's `max_headers_count`, and resets
            // the stream over it (as hyper does over the size limit).
            Ok(resp) if resp.headers().len() >= usize::from(self.answer_head.fields) => Err(
                SendError::Reset("answer over the cluster's max_headers_count".into()),
            ),
            Ok(resp) => Ok((resp, slot)),
            Err(e) => Err(SendError::Reset(e.to_string())),
        }
    }

    /// Idle HTTP/1.1 connections and HTTP/2 connections, for `/clusters`.
    pub fn describe(&self) -> (usize, u32) {
        let idle = self
            .workers
            .iter()
            .map(|w| w.idle.lock().map(|v| v.len()).unwrap_or(0))
            .sum();
        (idle, self.open.load(Relaxed))
    }
}

/// `first` and `also` in RFC 8305's order, as Envoy sorts them: the first
/// family's (`first`'s unless `order` names one) `order.count` at a time,
/// one of the other family's after each, each family's addresses in their
/// order.
fn interleaved(first: SocketAddr, also: &[SocketAddr], order: FamilyOrder) -> Vec<SocketAddr> {
    let v6_first = order.v6_first.unwrap_or(first.is_ipv6());
    let all = std::iter::once(first).chain(also.iter().copied());
    let (mut lead, mut other): (std::collections::VecDeque<_>, std::collections::VecDeque<_>) =
        all.partition(|a| a.is_ipv6() == v6_first);
    let mut out = Vec::with_capacity(lead.len() + other.len());
    while !(lead.is_empty() && other.is_empty()) {
        for _ in 0..order.count {
            out.extend(lead.pop_front());
        }
        out.extend(other.pop_front());
    }
    out
}

/// A connection to `addr`, from `source` when one is given.
async fn connect(addr: SocketAddr, source: Option<SocketAddr>) -> std::io::Result<TcpStream> {
    let Some(source) = source else {
        return TcpStream::connect(addr).await;
    };
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.bind(source).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot bind the source address {source}: {e}"),
        )
    })?;
    socket.connect(addr).await
}

/// One of an endpoint's open connections (or one being opened), counted
/// in [`Pool::open`], in its cluster's open connections and in its
/// worker's until dropped; then a request waiting on that worker may open
/// another.
pub struct OpenSlot(Arc<Share>);

impl OpenSlot {
    /// The pool's drains so far (see [`Pool::drain`]).
    pub(super) fn generation(&self) -> u32 {
        self.0.generation.load(Relaxed)
    }
}

impl std::fmt::Debug for OpenSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OpenSlot")
    }
}

impl Drop for OpenSlot {
    fn drop(&mut self) {
        let share = &self.0;
        share.endpoint_open.fetch_sub(1, Relaxed);
        share.stats.upstream_cx_active.fetch_sub(1, Relaxed);
        share.open.fetch_sub(1, Relaxed);
        // Every count above in order before the look at the waiting
        // (whose side has the same fence): a waiter either sees the room
        // or is woken.
        std::sync::atomic::fence(SeqCst);
        share.wake_one();
    }
}

/// The open streams of one HTTP/2 connection, and its worker's share.
struct Streams {
    open: AtomicU32,
    share: Arc<Share>,
}

/// What a new stream on an HTTP/2 connection is sent with: the connection,
/// the stream's slot and this side's address.
type H2Stream = (http2::SendRequest<ReqBody>, StreamSlot, Option<SocketAddr>);

/// A stream slot on an HTTP/2 connection, given back when dropped (also
/// when the response body is abandoned half way); a request waiting for
/// one may then take it.
pub struct StreamSlot(Arc<Streams>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        // A full barrier on x86 as on the waiting side: see `wake_one`.
        self.0.open.fetch_sub(1, SeqCst);
        self.0.share.wake_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use portico_proto::envoy::config::cluster::v3::cluster::{ClusterDiscoveryType, DiscoveryType};
    use portico_proto::envoy::config::cluster::v3::{
        circuit_breakers::Thresholds, CircuitBreakers, Cluster,
    };
    use portico_proto::google::protobuf::UInt32Value;

    /// A pool for `addr` with the default cluster settings.
    fn plain_pool(addr: SocketAddr) -> Pool {
        let cluster = Cluster {
            name: "c".into(),
            cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
            ..Default::default()
        };
        let cfg = ClusterConfig::convert(&cluster).unwrap();
        Pool::new(addr, &cfg, Arc::new(ClusterStats::default()))
    }

    /// An origin that accepts and holds connections without answering,
    /// and counts them.
    async fn holding_origin() -> (SocketAddr, Arc<AtomicU32>) {
        let origin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = origin.local_addr().unwrap();
        let accepted = Arc::new(AtomicU32::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = origin.accept().await {
                counter.fetch_add(1, Relaxed);
                held.push(s);
            }
        });
        (addr, accepted)
    }

    #[test]
    fn happy_eyeballs_interleave_the_families_from_the_first_ones() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let (v4a, v4b, v4c) = (a("127.0.0.1:1"), a("127.0.0.2:1"), a("127.0.0.3:1"));
        let (v6a, v6b) = (a("[::1]:1"), a("[::2]:1"));
        let plain = FamilyOrder::default();
        assert_eq!(
            interleaved(v6a, &[v6b, v4a, v4b, v4c], plain),
            [v6a, v4a, v6b, v4b, v4c]
        );
        assert_eq!(interleaved(v4a, &[v4b, v6a], plain), [v4a, v6a, v4b]);
        assert_eq!(interleaved(v4a, &[], plain), [v4a]);
        // Envoy's happy_eyeballs_config: a family named first, and more
        // than one of it before each of the other.
        let v4_by_two = FamilyOrder {
            v6_first: Some(false),
            count: 2,
        };
        assert_eq!(
            interleaved(v6a, &[v6b, v4a, v4b, v4c], v4_by_two),
            [v4a, v4b, v6a, v4c, v6b]
        );
    }

    /// An endpoint's other addresses: one that refuses is passed over at
    /// once; one that does not answer, after 300 ms (the next attempt
    /// starts then, and the first to connect wins).
    #[tokio::test]
    async fn connections_fall_over_to_the_other_addresses() {
        let (live, accepted) = holding_origin().await;
        let refusing = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        // A listener whose accept queue is full: its kernel drops SYNs, so
        // connects to it hang (loopback, bounded by the pool's timeout).
        let full =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        full.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        full.listen(0).unwrap();
        let hanging = full.local_addr().unwrap().as_socket().unwrap();
        let mut fillers = Vec::new();
        while fillers.len() < 4 {
            let s =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            s.set_nonblocking(true).unwrap();
            let _ = s.connect(&hanging.into());
            fillers.push(s);
        }
        let stats = Arc::new(ClusterStats::default());
        let cfg = ClusterConfig::convert(&Cluster {
            name: "c".into(),
            cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
            ..Default::default()
        })
        .unwrap();
        for (first, expect_wait) in [(refusing, false), (hanging, true)] {
            let pool = Pool::new(first, &cfg, stats.clone()).with_also(Arc::new([live]));
            let before = accepted.load(Relaxed);
            let started = Instant::now();
            let (io, _slot) = pool.tcp().await.expect("connected to the live address");
            let took = started.elapsed();
            assert_eq!(io.peer_addr().unwrap(), live);
            assert_eq!(accepted.load(Relaxed), before + 1);
            if expect_wait {
                assert!(
                    took >= Duration::from_millis(290) && took < Duration::from_millis(900),
                    "{took:?}"
                );
            } else {
                assert!(took < Duration::from_millis(250), "{took:?}");
            }
        }
        // None taking it: the connect error.
        let pool = Pool::new(refusing, &cfg, stats.clone()).with_also(Arc::new([refusing]));
        assert!(matches!(pool.tcp().await, Err(SendError::Connect(_))));
        assert_eq!(stats.upstream_cx_connect_fail.load(Relaxed), 1);
        drop(fillers);
    }

    /// How many of `n` concurrent first requests, spread over `pools` in
    /// turn, overflow, and how many connections each of `origins` has
    /// seen, 300 ms after they start (the origins never answer). Then the
    /// requests still under way are dropped (counted before: as their
    /// connections close, the requests still waiting would open others).
    async fn overflows(pools: &[Arc<Pool>], n: usize, origins: &[&AtomicU32]) -> (usize, Vec<u32>) {
        let sends: Vec<_> = (0..n)
            .map(|i| {
                let pool = pools[i % pools.len()].clone();
                tokio::spawn(async move {
                    let req = Request::new(Either::Right(Full::new(Bytes::new())));
                    pool.send(req).await
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let seen = origins.iter().map(|o| o.load(Relaxed)).collect();
        let mut overflow = 0;
        for s in sends {
            if s.is_finished() {
                if let Err(SendError::Overflow) = s.await.unwrap() {
                    overflow += 1;
                }
            } else {
                s.abort();
                let _ = s.await;
            }
        }
        (overflow, seen)
    }

    /// A cluster's config with these circuit-breaker thresholds (the
    /// cluster's; `per_host` for each endpoint's connections).
    fn limited(
        max_connections: u32,
        max_pending: Option<u32>,
        per_host: Option<u32>,
    ) -> ClusterConfig {
        let cluster = Cluster {
            name: "c".into(),
            cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
            circuit_breakers: Some(CircuitBreakers {
                thresholds: vec![Thresholds {
                    max_connections: Some(UInt32Value {
                        value: max_connections,
                    }),
                    max_pending_requests: max_pending.map(|value| UInt32Value { value }),
                    ..Default::default()
                }],
                per_host_thresholds: per_host
                    .map(|value| Thresholds {
                        max_connections: Some(UInt32Value { value }),
                        ..Default::default()
                    })
                    .into_iter()
                    .collect(),
            }),
            ..Default::default()
        };
        ClusterConfig::convert(&cluster).unwrap()
    }

    /// Connects racing each other count against `max_connections` while
    /// they are under way, and requests beyond it wait as pending ones, up
    /// to `max_pending_requests` (those connecting count too, as in
    /// Envoy): of ten concurrent first requests to an endpoint limited to
    /// two connections and six pending requests, four overflow at once,
    /// the origin sees two connections, and the rest wait.
    #[tokio::test]
    async fn parallel_connects_respect_the_connection_limit() {
        let (addr, accepted) = holding_origin().await;
        let stats = Arc::new(ClusterStats::default());
        let pool = Arc::new(Pool::new(addr, &limited(2, Some(6), None), stats.clone()));
        let (overflow, seen) = overflows(std::slice::from_ref(&pool), 10, &[&accepted]).await;
        assert_eq!(overflow, 4, "four of ten overflow");
        assert_eq!(seen, [2], "two connections reached the origin");
        let count = |c: &AtomicU64| c.load(Relaxed);
        assert_eq!(count(&stats.upstream_rq_pending_total), 6);
        assert_eq!(count(&stats.upstream_rq_pending_overflow), 4);
        assert_eq!(
            count(&stats.upstream_cx_overflow),
            4,
            "the four that waited"
        );
        assert_eq!(pool.open.load(Relaxed), 0, "all given back");
        assert_eq!(count(&stats.upstream_rq_pending_active), 0, "none pending");
    }

    /// Through a real socket: `upstream_connection_options.tcp_keepalive`
    /// turns keep-alive on with the settings given (the system's for the
    /// others); without it, or with a field at 0 (Envoy's off), it stays
    /// off; values the kernel would refuse are refused with the field
    /// named.
    #[tokio::test]
    async fn upstream_keepalive_is_set_on_connections() {
        use crate::proxy::int_sockopt as opt;
        use portico_proto::envoy::config::cluster::v3::UpstreamConnectionOptions;
        use portico_proto::envoy::config::core::v3::TcpKeepalive;
        let origin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = origin.local_addr().unwrap();
        let with = |k: Option<TcpKeepalive>| Cluster {
            name: "c".into(),
            cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
            upstream_connection_options: k.map(|k| UpstreamConnectionOptions {
                tcp_keepalive: Some(k),
                ..Default::default()
            }),
            ..Default::default()
        };
        let some = TcpKeepalive {
            keepalive_time: Some(UInt32Value { value: 42 }),
            keepalive_probes: Some(UInt32Value { value: 4 }),
            keepalive_interval: None,
        };
        let system_interval = {
            let plain = Pool::new(
                addr,
                &ClusterConfig::convert(&with(None)).unwrap(),
                Arc::default(),
            );
            let (io, _slot) = plain.tcp().await.unwrap();
            assert_eq!(
                opt(&io, libc::SOL_SOCKET, libc::SO_KEEPALIVE),
                0,
                "off unless asked"
            );
            opt(&io, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL)
        };
        let cfg = ClusterConfig::convert(&with(Some(some))).unwrap();
        let pool = Pool::new(addr, &cfg, Arc::default());
        let (io, _slot) = pool.tcp().await.unwrap();
        assert_eq!(opt(&io, libc::SOL_SOCKET, libc::SO_KEEPALIVE), 1);
        assert_eq!(opt(&io, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE), 42);
        assert_eq!(opt(&io, libc::IPPROTO_TCP, libc::TCP_KEEPCNT), 4);
        assert_eq!(
            opt(&io, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL),
            system_interval
        );
        let zero = TcpKeepalive {
            keepalive_interval: Some(UInt32Value { value: 0 }),
            ..some
        };
        let off = ClusterConfig::convert(&with(Some(zero))).unwrap();
        assert_eq!(off.keepalive, None, "0 turns it off");
        let over = TcpKeepalive {
            keepalive_probes: Some(UInt32Value { value: 128 }),
            ..some
        };
        let e = ClusterConfig::convert(&with(Some(over)))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("tcp_keepalive.keepalive_probes 128 is out of range"),
            "{e}"
        );
    }

    /// Through a real socket: an HTTP/2 upstream's `connection_keepalive`
    /// pings the connection, and one whose PING goes unanswered is closed
    /// after the timeout; without it, no PING is sent.
    #[tokio::test]
    // (The cluster's own HTTP/2 options: deprecated, still read.)
    #[allow(deprecated)]
    async fn http2_upstreams_are_pinged_as_configured() {
        use portico_proto::envoy::config::core::v3::{Http2ProtocolOptions, KeepaliveSettings};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let ms = |ms: i32| portico_proto::google::protobuf::Duration {
            seconds: 0,
            nanos: ms * 1_000_000,
        };
        // An origin that speaks just enough HTTP/2 for the handshake, then
        // reads frames without ever answering: says whether a PING came
        // and whether the client then closed, within two seconds.
        async fn mute_origin(origin: tokio::net::TcpListener) -> (bool, bool) {
            let (mut s, _) = origin.accept().await.unwrap();
            // SETTINGS (empty), then an ACK of the client's.
            s.write_all(b"\0\0\0\x04\0\0\0\0\0\0\0\0\x04\x01\0\0\0\0")
                .await
                .unwrap();
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
            let closed = loop {
                match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => break true,
                    Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
                    Err(_) => break false,
                }
            };
            // Frames after the 24-byte preface: 9-byte headers.
            let (mut at, mut pinged) = (24, false);
            while at + 9 <= seen.len() {
                let len = usize::from(seen[at]) << 16
                    | usize::from(seen[at + 1]) << 8
                    | usize::from(seen[at + 2]);
                pinged |= seen[at + 3] == 0x6;
                at += 9 + len;
            }
            (pinged, closed)
        }
        for keepalive in [true, false] {
            let origin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = origin.local_addr().unwrap();
            let cluster = Cluster {
                name: "c".into(),
                cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
                http2_protocol_options: Some(Http2ProtocolOptions {
                    connection_keepalive: keepalive.then(|| KeepaliveSettings {
                        interval: Some(ms(100)),
                        timeout: Some(ms(200)),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            };
            let cfg = ClusterConfig::convert(&cluster).unwrap();
            let pool = Pool::new(addr, &cfg, Arc::default());
            let (tx, seen) = tokio::join!(pool.connect_h2_at(addr), mute_origin(origin));
            let _tx = tx.expect("handshake");
            assert_eq!(seen, (keepalive, keepalive), "keepalive {keepalive}");
        }
        // A timeout under a millisecond is refused.
        let o = Http2ProtocolOptions {
            connection_keepalive: Some(KeepaliveSettings {
                interval: Some(ms(100)),
                ..Default::default()
            }),
            ..Default::default()
        };
        let cluster = Cluster {
            name: "c".into(),
            http2_protocol_options: Some(o),
            cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
            ..Default::default()
        };
        let e = ClusterConfig::convert(&cluster).unwrap_err().to_string();
        assert!(
            e.contains("connection_keepalive.timeout must be at least 1ms"),
            "{e}"
        );
    }

    /// Through a real socket: `upstream_bind_config` makes connections
    /// from its source address (127.0.0.2 here, a loopback address of its
    /// own); a bind option this proxy does not have is refused.
    #[tokio::test]
    async fn connections_come_from_the_bound_source_address() {
        use portico_proto::envoy::config::core::v3::{BindConfig, SocketAddress};
        let origin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = origin.local_addr().unwrap();
        let mut cluster = Cluster {
            name: "c".into(),
            cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
            upstream_bind_config: Some(BindConfig {
                source_address: Some(SocketAddress {
                    address: "127.0.0.2".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let cfg = ClusterConfig::convert(&cluster).unwrap();
        let pool = Pool::new(addr, &cfg, Arc::new(ClusterStats::default()));
        let (connected, accepted) = tokio::join!(pool.tcp(), origin.accept());
        assert!(connected.is_ok(), "{:?}", connected.err());
        let (_, peer) = accepted.unwrap();
        assert_eq!(peer.ip().to_string(), "127.0.0.2");
        if let Some(b) = cluster.upstream_bind_config.as_mut() {
            b.freebind = Some(portico_proto::google::protobuf::BoolValue { value: true });
        }
        let e = ClusterConfig::convert(&cluster).unwrap_err().to_string();
        assert!(
            e.contains("upstream_bind_config") && e.contains("freebind"),
            "{e}"
        );
        // Without a source address: the system's choice, as without it.
        cluster.upstream_bind_config = Some(BindConfig::default());
        let cfg = ClusterConfig::convert(&cluster).expect("converts");
        assert_eq!(cfg.source_address, None);
    }

    /// The cluster's `max_connections` spans all its endpoints (Envoy's
    /// circuit breaker is the cluster's), and `per_host_thresholds` limits
    /// each: with 3 for the cluster and 2 per endpoint, ten concurrent
    /// first requests to each of two endpoints open three connections,
    /// no more than two to either; the others wait. But an endpoint with
    /// no connection at all opens one past the cluster's limit (Envoy's
    /// rule: its requests would have nothing to wait for): with 1 for the
    /// cluster, each endpoint gets its one.
    #[tokio::test]
    async fn the_connection_limit_is_the_clusters_and_each_endpoints() {
        for (cluster_max, opened) in [(3, 3), (1, 2)] {
            let cfg = limited(cluster_max, None, Some(2));
            let stats = Arc::new(ClusterStats::default());
            let (a, seen_a) = holding_origin().await;
            let (b, seen_b) = holding_origin().await;
            let pools = [
                Arc::new(Pool::new(a, &cfg, stats.clone())),
                Arc::new(Pool::new(b, &cfg, stats.clone())),
            ];
            let (overflow, seen) = overflows(&pools, 20, &[&seen_a, &seen_b]).await;
            let (na, nb) = (seen[0], seen[1]);
            assert_eq!((overflow, na + nb), (0, opened), "{na} + {nb}");
            assert!(na <= 2 && nb <= 2 && na >= 1 && nb >= 1, "{na} + {nb}");
            assert_eq!(
                stats.upstream_cx_overflow.load(Relaxed),
                u64::from(20 - opened)
            );
            assert_eq!(stats.upstream_cx_active.load(Relaxed), 0, "all given back");
            assert_eq!(stats.upstream_rq_pending_active.load(Relaxed), 0);
        }
    }

    /// An origin that answers each request after `delay`, closing the
    /// connection after each answer when `close`; counts the connections
    /// it accepted and the most it had open at once.
    async fn answering_origin(
        delay: Duration,
        close: bool,
    ) -> (SocketAddr, Arc<AtomicU32>, Arc<AtomicU32>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let origin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = origin.local_addr().unwrap();
        let (accepted, most) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
        let (a, m) = (accepted.clone(), most.clone());
        let open = Arc::new(AtomicU32::new(0));
        tokio::spawn(async move {
            while let Ok((mut s, _)) = origin.accept().await {
                a.fetch_add(1, Relaxed);
                let now = open.fetch_add(1, Relaxed) + 1;
                m.fetch_max(now, Relaxed);
                let open = open.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    // One answer per request head (they come one at a time).
                    while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {
                        tokio::time::sleep(delay).await;
                        let ok: &[u8] = if close {
                            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                        } else {
                            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
                        };
                        if s.write_all(ok).await.is_err() || close {
                            break;
                        }
                    }
                    open.fetch_sub(1, Relaxed);
                });
            }
        });
        (addr, accepted, most)
    }

    /// Through real sockets: a request for a socket of its own (an
    /// upgrade's) waiting at the connection limit takes the connection
    /// that comes back idle, rather than let its wake-up go to waste.
    #[tokio::test]
    async fn a_waiting_upgrade_takes_the_connection_that_comes_back() {
        let (addr, accepted, _) = answering_origin(Duration::from_millis(100), false).await;
        let pool = Arc::new(Pool::new(addr, &limited(1, None, None), Arc::default()));
        let busy = {
            let pool = pool.clone();
            tokio::spawn(async move {
                let req = Request::new(Either::Right(Full::new(Bytes::new())));
                let (resp, _) = pool.send(req).await.expect("answered");
                http_body_util::BodyExt::collect(resp.into_body())
                    .await
                    .unwrap();
            })
        };
        while accepted.load(Relaxed) < 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let socket = tokio::time::timeout(Duration::from_secs(5), pool.tcp()).await;
        busy.await.unwrap();
        let (io, _slot) = socket.expect("not left waiting").expect("a socket");
        assert_eq!(io.peer_addr().unwrap(), addr);
        assert_eq!(accepted.load(Relaxed), 1, "the same connection");
    }

    /// Through real sockets: an answer with both `Content-Length` and
    /// chunked framing is Envoy's protocol error, unless the cluster's
    /// `allow_chunked_length`; then it is read as chunked.
    #[tokio::test]
    async fn answers_with_both_framings_need_the_clusters_leave() {
        use portico_proto::envoy::config::core::v3::Http1ProtocolOptions;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let origin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = origin.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = origin.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    if matches!(s.read(&mut buf).await, Ok(n) if n > 0) {
                        let both = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n";
                        let _ = s.write_all(both).await;
                    }
                });
            }
        });
        for allowed in [false, true] {
            // (The cluster's own field: deprecated, still read.)
            #[allow(deprecated)]
            let cluster = Cluster {
                name: "c".into(),
                cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
                http_protocol_options: allowed.then(|| Http1ProtocolOptions {
                    allow_chunked_length: true,
                    ..Default::default()
                }),
                ..Default::default()
            };
            let pool = Pool::new(
                addr,
                &ClusterConfig::convert(&cluster).unwrap(),
                Arc::default(),
            );
            let sent = pool
                .send(Request::new(Either::Right(Full::new(Bytes::new()))))
                .await;
            match (allowed, sent) {
                (false, Err(SendError::Protocol(why))) => {
                    assert!(
                        why.contains("both Content-Length and Transfer-Encoding"),
                        "{why}"
                    )
                }
                (true, Ok((resp, _))) => {
                    let body = http_body_util::BodyExt::collect(resp.into_body())
                        .await
                        .unwrap();
                    assert_eq!(body.to_bytes(), "ok");
                }
                (allowed, other) => panic!("allowed {allowed}: {:?}", other.map(|r| r.0.status())),
            }
        }
    }

    /// Through real sockets: a drained pool closes its idle connection and
    /// does not reuse the one busy during the drain; connections opened
    /// after it are reused as before.
    #[tokio::test]
    async fn drained_pools_use_new_connections() {
        let (addr, accepted, _) = answering_origin(Duration::from_millis(100), false).await;
        let pool = Arc::new(plain_pool(addr));
        let get = |pool: Arc<Pool>| async move {
            let req = Request::new(Either::Right(Full::new(Bytes::new())));
            let (resp, _) = pool.send(req).await.expect("answered");
            http_body_util::BodyExt::collect(resp.into_body())
                .await
                .unwrap();
        };
        get(pool.clone()).await;
        assert_eq!(pool.describe().0, 1, "one idle connection");
        pool.drain();
        assert_eq!(pool.describe().0, 0, "closed at once");
        // Busy during the next drain: not used again.
        let busy = tokio::spawn(get(pool.clone()));
        while accepted.load(Relaxed) < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        pool.drain();
        busy.await.unwrap();
        get(pool.clone()).await;
        get(pool.clone()).await;
        assert_eq!(accepted.load(Relaxed), 3, "one each time, then reused");
    }

    /// Through real sockets: requests past `max_connections` wait for a
    /// connection and are all answered: on the one connection as it comes
    /// back idle, or on a new one each time the origin closes the last.
    #[tokio::test]
    async fn pending_requests_get_the_connection_that_frees() {
        for close in [false, true] {
            let (addr, accepted, most) = answering_origin(Duration::from_millis(20), close).await;
            let stats = Arc::new(ClusterStats::default());
            let pool = Arc::new(Pool::new(addr, &limited(1, None, None), stats.clone()));
            let sends: Vec<_> = (0..4)
                .map(|_| {
                    let pool = pool.clone();
                    tokio::spawn(async move {
                        let req = Request::new(Either::Right(Full::new(Bytes::new())));
                        let send = tokio::time::timeout(Duration::from_secs(5), pool.send(req));
                        let (resp, _) = send.await.expect("answered in time").expect("answered");
                        let status = resp.status();
                        // (The body's end gives the connection back.)
                        http_body_util::BodyExt::collect(resp.into_body())
                            .await
                            .unwrap();
                        status
                    })
                })
                .collect();
            for s in sends {
                assert_eq!(s.await.unwrap(), 200, "close {close}");
            }
            let (n, most) = (accepted.load(Relaxed), most.load(Relaxed));
            assert_eq!((n, most), (if close { 4 } else { 1 }, 1), "close {close}");
            assert_eq!(stats.upstream_rq_pending_total.load(Relaxed), 4);
            assert_eq!(stats.upstream_cx_overflow.load(Relaxed), 3);
            assert_eq!(stats.upstream_rq_pending_active.load(Relaxed), 0);
        }
    }

    /// Through real sockets: with `max_connection_duration`, a connection
    /// that has been open longer takes no new request (a new one is
    /// opened); without it, the same connection serves on.
    #[tokio::test]
    async fn old_connections_take_no_new_requests() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let origin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = origin.local_addr().unwrap();
        let opened = Arc::new(AtomicU32::new(0));
        let counted = opened.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = origin.accept().await {
                counted.fetch_add(1, Relaxed);
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    // One answer per request head (they come one at a time).
                    while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {
                        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                        if s.write_all(ok).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let with_age = |age: Option<u32>| {
            use portico_proto::envoy::config::core::v3::HttpProtocolOptions;
            // (The cluster's own protocol options: deprecated, still read.)
            #[allow(deprecated)]
            let cluster = Cluster {
                name: "c".into(),
                cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
                common_http_protocol_options: age.map(|ms| HttpProtocolOptions {
                    max_connection_duration: Some(portico_proto::google::protobuf::Duration {
                        seconds: 0,
                        nanos: (ms * 1_000_000) as i32,
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            };
            let cfg = ClusterConfig::convert(&cluster).unwrap();
            Pool::new(addr, &cfg, Arc::new(ClusterStats::default()))
        };
        for (age, connections) in [(None, 1), (Some(100), 2)] {
            let pool = with_age(age);
            let before = opened.load(Relaxed);
            for wait in [0, 150] {
                tokio::time::sleep(Duration::from_millis(wait)).await;
                let (resp, _) = pool
                    .send(Request::new(Either::Right(Full::new(Bytes::new()))))
                    .await
                    .unwrap();
                assert_eq!(resp.status(), 200);
            }
            assert_eq!(opened.load(Relaxed) - before, connections, "age {age:?}");
        }
    }

    /// An idle connection the origin closed is let go by the sweep, with
    /// no request needed to find out.
    #[tokio::test]
    async fn the_sweep_closes_idle_connections_the_origin_closed() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let origin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = origin.local_addr().unwrap();
        let (close_tx, close_rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let (mut s, _) = origin.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                .await;
            let _ = close_rx.await;
            drop(s);
        });
        let pool = plain_pool(addr);
        let (resp, _) = pool
            .send(Request::new(Either::Right(Full::new(Bytes::new()))))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        drop(resp);
        assert_eq!(pool.describe(), (1, 1), "one idle connection");
        pool.sweep_idle();
        assert_eq!(pool.describe(), (1, 1), "still good: kept");
        close_tx.send(()).unwrap();
        let swept = async {
            loop {
                pool.sweep_idle();
                if pool.describe() == (0, 0) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), swept)
            .await
            .expect("the closed connection is swept");
    }

    /// A reused connection that the origin closed just before the request
    /// went out (its FIN not yet seen: the runtime has not polled since)
    /// costs a GET nothing: it is sent again on a new connection. A POST
    /// is not sent twice: it fails.
    #[tokio::test]
    async fn a_get_on_a_connection_the_origin_just_closed_is_sent_again() {
        use http_body_util::BodyExt;
        use std::io::{Read, Write};
        use std::sync::mpsc;
        let origin = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = origin.local_addr().unwrap();
        let (close_tx, close_rx) = mpsc::channel::<()>();
        let (closed_tx, closed_rx) = mpsc::channel::<()>();
        // A blocking origin on its own thread: each connection gets one
        // answer, then is closed on request.
        let server = std::thread::spawn(move || {
            let mut accepted = 0;
            for answer in ["first", "again"] {
                let (mut s, _) = origin.accept().unwrap();
                accepted += 1;
                let mut buf = [0u8; 4096];
                let n = s.read(&mut buf).unwrap();
                assert!(buf[..n].starts_with(b"GET / HTTP/1.1\r\n"));
                let resp = format!("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n{answer}");
                s.write_all(resp.as_bytes()).unwrap();
                close_rx.recv().unwrap();
                drop(s);
                closed_tx.send(()).unwrap();
            }
            // Nothing else may arrive: the POST is not sent again.
            origin.set_nonblocking(true).unwrap();
            close_rx.recv().unwrap();
            while origin.accept().is_ok() {
                accepted += 1;
            }
            accepted
        });
        let pool = plain_pool(addr);
        let get = || Request::new(Either::Right(Full::new(Bytes::new())));
        let text = |resp: Response<RespBody>| async move {
            let b = resp.into_body().collect().await.unwrap().to_bytes();
            String::from_utf8(b.to_vec()).unwrap()
        };

        let (resp, _) = pool.send(get()).await.unwrap();
        assert_eq!(text(resp).await, "first");
        assert_eq!(pool.describe(), (1, 1), "kept for reuse");
        // Blocking waits: the runtime must not see the FIN before the
        // next request takes the connection.
        close_tx.send(()).unwrap();
        closed_rx.recv().unwrap();
        let (resp, _) = pool.send(get()).await.expect("the GET is sent again");
        assert_eq!(text(resp).await, "again");

        close_tx.send(()).unwrap();
        closed_rx.recv().unwrap();
        let mut post = Request::new(Either::Right(Full::new(Bytes::from_static(b"x"))));
        *post.method_mut() = http::Method::POST;
        match pool.send(post).await {
            Err(SendError::Reset(_)) => {}
            Err(e) => panic!("expected a reset, got {e}"),
            Ok((r, _)) => panic!("expected a reset, got {}", r.status()),
        }
        close_tx.send(()).unwrap();
        assert_eq!(server.join().unwrap(), 2, "two connections, no third");
    }
}
