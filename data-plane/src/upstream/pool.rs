//! Connections to one endpoint: an idle stack of HTTP/1.1 connections with
//! keep-alive (driven by the request's own task, see [`super::h1`]), or a
//! few HTTP/2 connections, another opened when every one is at its stream
//! limit (one connection per endpoint stalls under load).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::h1::{self, IdleList};
use crate::config::cluster::ClusterConfig;
use crate::proxy::body::RequestBody;
use crate::stats::ClusterStats;

/// The body of an upstream request: streamed from downstream, or buffered
/// so that it can be sent again on retry.
pub type ReqBody = Either<RequestBody, Full<Bytes>>;

/// The body of an upstream response: from an HTTP/1.1 connection of the
/// pool, or from hyper (HTTP/2, and upgrades refused by the upstream).
pub type RespBody = Either<h1::Body, Incoming>;

/// Why a request never got a response from the endpoint.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// TCP connect failed or timed out.
    #[error("connection failure: {0}")]
    Connect(String),
    /// The connection or stream was reset before response headers.
    #[error("connection termination: {0}")]
    Reset(String),
    /// The circuit breaker's connection limit is reached.
    #[error("overflow: too many connections")]
    Overflow,
}

struct H2 {
    tx: http2::SendRequest<ReqBody>,
    streams: Arc<AtomicU32>,
}

/// A connection pool for one endpoint.
pub struct Pool {
    addr: SocketAddr,
    http2: bool,
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_streams: u32,
    max_uses: u32,
    max_connections: u32,
    idle: IdleList,
    h2: Mutex<Vec<H2>>,
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
    /// An empty pool.
    pub fn new(addr: SocketAddr, cfg: &ClusterConfig, stats: Arc<ClusterStats>) -> Self {
        Pool {
            addr,
            http2: cfg.http2,
            connect_timeout: cfg.connect_timeout,
            idle_timeout: cfg.idle_timeout,
            max_streams: cfg.max_concurrent_streams,
            max_uses: cfg.max_requests_per_connection.unwrap_or(u32::MAX),
            max_connections: cfg.limits.max_connections,
            idle: IdleList::default(),
            h2: Mutex::new(Vec::new()),
            open: Arc::new(AtomicU32::new(0)),
            stats,
        }
    }

    /// Sends a request. An HTTP/2 response holds a stream slot, which must
    /// live as long as its body; an HTTP/1.1 body returns its connection to
    /// the pool itself when it ends cleanly.
    pub async fn send(
        &self,
        req: Request<ReqBody>,
    ) -> Result<(Response<RespBody>, Option<StreamSlot>), SendError> {
        if self.http2 {
            // Boxed: hyper's HTTP/2 client state is large, and every
            // HTTP/1.1 request's future would otherwise be as large as it.
            let (resp, slot) = Box::pin(self.send_h2(req)).await?;
            return Ok((resp.map(Either::Right), Some(slot)));
        }
        let conn = match self.take_idle() {
            Some(c) => c,
            // Boxed: connecting is rare next to reuse, and its state large.
            None => h1::Connection::new(Box::pin(self.tcp()).await?, self.open.clone()),
        };
        let ret = h1::Return {
            idle: self.idle.clone(),
            max_uses: self.max_uses,
        };
        let resp = h1::exchange(conn, req, &ret).await?;
        Ok((resp.map(Either::Left), None))
    }

    /// The most recently used idle connection that is still good.
    fn take_idle(&self) -> Option<h1::Connection> {
        let good = |c: &h1::Connection| c.since.elapsed() <= self.idle_timeout && c.is_usable();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
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

    async fn tcp(&self) -> Result<TcpStream, SendError> {
        if self.open.load(Relaxed) >= self.max_connections {
            self.stats.cx_overflow.fetch_add(1, Relaxed);
            return Err(SendError::Overflow);
        }
        let stream =
            match tokio::time::timeout(self.connect_timeout, TcpStream::connect(self.addr)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    self.stats.cx_connect_fail.fetch_add(1, Relaxed);
                    return Err(SendError::Connect(e.to_string()));
                }
                Err(_) => {
                    self.stats.cx_connect_fail.fetch_add(1, Relaxed);
                    return Err(SendError::Connect(format!(
                        "timed out after {:?}",
                        self.connect_timeout
                    )));
                }
            };
        let _ = stream.set_nodelay(true);
        self.stats.cx_total.fetch_add(1, Relaxed);
        Ok(stream)
    }

    /// Opens a hyper connection that is not pooled (for upgrades and health
    /// checks), with upgrades on.
    pub async fn connect_h1(&self) -> Result<http1::SendRequest<ReqBody>, SendError> {
        let io = TokioIo::new(self.tcp().await?);
        let (tx, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|e| SendError::Connect(e.to_string()))?;
        let open = self.open.clone();
        open.fetch_add(1, Relaxed);
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
            open.fetch_sub(1, Relaxed);
        });
        Ok(tx)
    }

    async fn send_h2(
        &self,
        req: Request<ReqBody>,
    ) -> Result<(Response<Incoming>, StreamSlot), SendError> {
        let found = {
            let mut conns = self.h2.lock().unwrap_or_else(|p| p.into_inner());
            conns.retain(|c| !c.tx.is_closed());
            conns
                .iter()
                .find(|c| c.streams.load(Relaxed) < self.max_streams)
                .map(|c| {
                    c.streams.fetch_add(1, Relaxed);
                    (c.tx.clone(), StreamSlot(c.streams.clone()))
                })
        };
        let (mut tx, slot) = match found {
            Some(f) => f,
            None => {
                let io = TokioIo::new(self.tcp().await?);
                let (tx, conn) = http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .handshake(io)
                    .await
                    .map_err(|e| SendError::Connect(e.to_string()))?;
                let open = self.open.clone();
                open.fetch_add(1, Relaxed);
                tokio::spawn(async move {
                    let _ = conn.await;
                    open.fetch_sub(1, Relaxed);
                });
                let streams = Arc::new(AtomicU32::new(1));
                self.h2.lock().unwrap_or_else(|p| p.into_inner()).push(H2 {
                    tx: tx.clone(),
                    streams: streams.clone(),
                });
                (tx, StreamSlot(streams))
            }
        };
        if tx.ready().await.is_err() {
            return Err(SendError::Reset("HTTP/2 connection closed".into()));
        }
        match tx.send_request(req).await {
            Ok(resp) => Ok((resp, slot)),
            Err(e) => Err(SendError::Reset(e.to_string())),
        }
    }

    /// Idle HTTP/1.1 connections and HTTP/2 connections, for `/clusters`.
    pub fn describe(&self) -> (usize, u32) {
        let idle = self.idle.lock().map(|v| v.len()).unwrap_or(0);
        (idle, self.open.load(Relaxed))
    }
}

/// A stream slot on an HTTP/2 connection, given back when dropped (also
/// when the response body is abandoned half way).
pub struct StreamSlot(Arc<AtomicU32>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}
